//! hush mix node (shuffler). Filled in by the shuffler issue.
