//! hush leader and helper aggregators. Filled in by the aggregator issue.
