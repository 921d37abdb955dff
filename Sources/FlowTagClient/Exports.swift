// The CLI speaks the wire types (filters, stats, event lines) the agent answers with.
@_exported import FlowTagWire
