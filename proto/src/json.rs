//! The protobuf (proto3) JSON mapping of NSM messages: lowerCamelCase field names,
//! enum values by name, timestamps in RFC 3339, maps as objects.
//!
//! Backed by the descriptors compiled into this crate and prost-reflect's canonical
//! serializer, so the output is what any other protobuf implementation prints.

use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// An error turning a message into or out of JSON.
#[derive(Debug)]
pub struct JsonError(String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("descriptor set compiled by build.rs decodes")
    })
}

/// Serializes `msg`, a message of the proto type `full_name` (for example
/// `"connection.Connection"`), with the protobuf JSON mapping.
pub fn to_json<M: Message>(full_name: &str, msg: &M) -> Result<String, JsonError> {
    let desc = pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| JsonError(format!("unknown message type {full_name}")))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| JsonError(e.to_string()))?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut ser, &SerializeOptions::new())
        .map_err(|e| JsonError(e.to_string()))?;
    String::from_utf8(out).map_err(|e| JsonError(e.to_string()))
}

/// Parses JSON in the protobuf JSON mapping into a message of the proto type `full_name`.
pub fn from_json<M: Message + Default>(full_name: &str, json: &str) -> Result<M, JsonError> {
    let desc = pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| JsonError(format!("unknown message type {full_name}")))?;
    let mut de = serde_json::Deserializer::from_str(json);
    let dynamic =
        DynamicMessage::deserialize(desc, &mut de).map_err(|e| JsonError(e.to_string()))?;
    de.end().map_err(|e| JsonError(e.to_string()))?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| JsonError(e.to_string()))
}

/// The connection as one line of JSON (the form `nsc` prints).
pub fn connection_to_json(conn: &crate::connection::Connection) -> String {
    to_json("connection.Connection", conn).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
