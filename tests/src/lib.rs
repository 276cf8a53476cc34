//! Scenario and end-to-end tests for nsm-rs.
