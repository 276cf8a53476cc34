//! nsm-sdk
