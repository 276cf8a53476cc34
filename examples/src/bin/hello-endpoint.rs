//! `hello-endpoint`: write your own endpoint. It serves the network service `hello`
//! with point-to-point addresses, the NOOP mechanism and one handler of its own.

use std::process::ExitCode;

use async_trait::async_trait;
use nsm_examples::{run, serve_endpoint, EndpointArgs};
use nsm_sdk::chains::{endpoint, EndpointOptions};
use nsm_sdk::handlers::{mechanisms, noop_server, point_to_point};
use nsm_sdk::proto::{connection::Connection, networkservice::NetworkServiceRequest};
use nsm_sdk::{wire::types, Cx, Error, Handler, Next, Result};

/// Our own logic: refuse clients labelled `color=red`, greet the others with a label.
struct Greeter;

#[async_trait]
impl Handler for Greeter {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        if conn.labels.get("color").is_some_and(|c| c == "red") {
            return Err(Error::PermissionDenied(
                "hello does not serve red clients".into(),
            ));
        }
        conn.labels.insert("greeting".into(), "hello".into());
        next.request(cx, req).await
    }
}

/// A tiny NSE serving `hello`, registered through its node's manager.
#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    endpoint: EndpointArgs,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let prefix = "169.254.0.0/16".parse().expect("a valid prefix");
        let hello = endpoint(
            &args.endpoint.name,
            EndpointOptions::new()
                .handler(Greeter)
                .handler(point_to_point(vec![prefix]))
                .handler(mechanisms().with(types::NOOP, noop_server())),
        );
        let no_labels = Default::default();
        serve_endpoint(&args.endpoint, &hello, &["hello".into()], &no_labels, stop).await
    })
}
