/// The version of this agent and CLI (`GET /v1/version`, `flowtag version`).
public let flowtagVersion = "0.1.0"
