/// WFP-semantics flow-context store and callout engine (see issue 3).
public enum FlowContextModule {}
