// The agent speaks the client's types (records, filters, stats, event lines).
@_exported import FlowTagClient
