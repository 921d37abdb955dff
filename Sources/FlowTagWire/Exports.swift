// Records, addresses and wall time are part of what the wire carries.
@_exported import FlowTagCore
