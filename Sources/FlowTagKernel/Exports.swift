@_exported import FlowTagCore
