//! # nsm-sdk
//!
//! A Rust SDK for Network Service Mesh: every component (client, endpoint, manager,
//! forwarder, registry) is a chain of small composable [`Handler`]s that an application
//! picks and orders. The wire protocol is NSM API v1 ([`nsm_proto`]), so the parts built
//! here interoperate with other NSM implementations.
//!
//! Floors, from the ground up: [`error`], [`wire`] (the wire constants of mechanisms and
//! payloads), [`security`] (SPIFFE identities, mTLS configs, signed path tokens, Rego
//! policies), [`core`] (the handler trait, chains, context, per-connection handles, the
//! runtime layer `core::rt`, URLs, tower adapters), [`config`] (NS URLs and
//! NetworkService files), [`token`] (token generators), [`registry`], [`ipam`] (vL3
//! prefixes), [`transport`],
//! [`handlers`], [`chains`], [`serving`] (running an endpoint or a forwarder as a
//! program), and `sandbox` (feature `sandbox`). A floor uses only the floors below it;
//! `cargo nextest run -p nsm-sdk --test layers` checks it, and that no two modules at the
//! same level import each other.

#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

pub mod chains;
pub mod config;
pub mod core;
pub mod error;
pub mod handlers;
pub mod ipam;
pub mod registry;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod security;
pub mod serving;
pub mod token;
pub mod transport;
pub mod wire;

pub use crate::core::{Chain, ChainBuilder, ConnHandle, Cx, Handler, Next, Side};
pub use crate::error::{Error, Result};
pub use nsm_proto as proto;

/// Re-exported so handlers can be written without a direct dependency:
/// `#[nsm_sdk::async_trait] impl Handler for MyHandler { ... }`.
pub use async_trait::async_trait;

/// The README's examples compile as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
