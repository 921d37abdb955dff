import FlowTagCore

/// A flow as the API returns it: the record's fields plus `state`.
public struct APIFlow: Decodable, Sendable {
    public var state: FlowState
    public var record: FlowRecord

    enum CodingKeys: String, CodingKey { case state }
    public init(from decoder: any Decoder) throws {
        state = try decoder.container(keyedBy: CodingKeys.self).decode(FlowState.self, forKey: .state)
        record = try FlowRecord(from: decoder)
    }
}

public struct APIFlowList: Decodable, Sendable {
    public var flows: [APIFlow]
}
