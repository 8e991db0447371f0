//! Record logs: block ids instead of data (see docs/record-log.md).
