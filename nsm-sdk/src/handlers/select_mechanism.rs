//! [`select_mechanism()`]: the first step every server-side mechanism handler takes
//! (NOOP, and the KERNEL and VXLAN handlers of the data plane crates), written once.

use nsm_proto::connection::Mechanism;
use nsm_proto::networkservice::NetworkServiceRequest;

use crate::{Error, Result};

/// The mechanism of type `mechanism_type` a server-side handler works on: the
/// connection's mechanism when it has one (a refresh, or what `mechanisms` chose),
/// else the request's first preference of that type, which becomes the connection's.
///
/// A connection that carries another type, or a request with neither, is
/// InvalidArgument naming `who` (`"<who> got a VXLAN mechanism"`,
/// `"<who>: the request offers no KERNEL mechanism"`).
pub fn select_mechanism<'r>(
    req: &'r mut NetworkServiceRequest,
    mechanism_type: &str,
    who: &str,
) -> Result<&'r mut Mechanism> {
    let conn = req.connection.get_or_insert_with(Default::default);
    if conn.mechanism.is_none() {
        conn.mechanism = req
            .mechanism_preferences
            .iter()
            .find(|m| m.r#type == mechanism_type)
            .cloned();
    }
    match conn.mechanism.as_mut() {
        Some(m) if m.r#type == mechanism_type => Ok(m),
        Some(m) => Err(Error::invalid(format!(
            "{who} got a {} mechanism",
            m.r#type
        ))),
        None => Err(Error::invalid(format!(
            "{who}: the request offers no {mechanism_type} mechanism"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::types;
    use nsm_proto::connection::Connection;

    fn mech(t: &str, name: &str) -> Mechanism {
        Mechanism {
            r#type: t.into(),
            parameters: [("name".to_string(), name.to_string())].into(),
            ..Default::default()
        }
    }

    fn req(conn: Option<Mechanism>, prefs: Vec<Mechanism>) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                mechanism: conn,
                ..Default::default()
            }),
            mechanism_preferences: prefs,
        }
    }

    #[test]
    fn the_first_preference_of_the_type_becomes_the_connections_mechanism() {
        let mut r = req(
            None,
            vec![
                mech(types::NOOP, "a"),
                mech(types::KERNEL, "b"),
                mech(types::KERNEL, "c"),
            ],
        );
        let m = select_mechanism(&mut r, types::KERNEL, "x").unwrap();
        assert_eq!(m, &mech(types::KERNEL, "b"));
        assert_eq!(
            r.connection.unwrap().mechanism,
            Some(mech(types::KERNEL, "b"))
        );
    }

    #[test]
    fn a_carried_mechanism_of_the_type_is_kept_over_the_preferences() {
        let mut r = req(
            Some(mech(types::KERNEL, "kept")),
            vec![mech(types::KERNEL, "offered")],
        );
        let m = select_mechanism(&mut r, types::KERNEL, "x").unwrap();
        assert_eq!(m.parameters["name"], "kept");
    }

    #[test]
    fn another_type_or_none_is_invalid_argument_naming_the_handler() {
        let mut r = req(
            Some(mech(types::VXLAN, "v")),
            vec![mech(types::KERNEL, "k")],
        );
        let err = select_mechanism(&mut r, types::KERNEL, "kernel thing").unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m == "kernel thing got a VXLAN mechanism"),
            "{err}"
        );
        let mut r = req(None, vec![mech(types::NOOP, "n")]);
        let err = select_mechanism(&mut r, types::KERNEL, "kernel thing").unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m)
                if m == "kernel thing: the request offers no KERNEL mechanism"),
            "{err}"
        );
    }
}
