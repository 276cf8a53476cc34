//! The option setters every chain's options share, written once: `tokens`, `policies`,
//! `security`, `root`, and `channels` for the chains with a client half. The options
//! type keeps them in two fields: `sec: Secured` and `root: CancellationToken`.

/// Generates the shared setters inside an `impl XOptions` block.
///
/// `policies:` says where the chain puts its authorize handlers, `security:` what the
/// component secures (both complete the setters' doc comments); `channels` adds the
/// channel-pool setter.
macro_rules! secured_setters {
    (policies: $policies:literal, security: $security:literal $(, $channels:ident)?) => {
        $(
            #[doc = "Shares this channel pool (one gRPC channel per peer in the process)."]
            pub fn $channels(mut self, channels: $crate::transport::Channels) -> Self {
                self.sec.channels = channels;
                self
            }
        )?

        /// The token generator that signs this hop's path segment (default: unsigned
        /// tokens that live 10 minutes).
        pub fn tokens(mut self, tokens: std::sync::Arc<dyn $crate::token::TokenGenerator>) -> Self {
            self.sec.tokens = tokens;
            self
        }

        #[doc = concat!("Authorizes with these policies (e.g. [`PolicySet::from_env`](crate::security::PolicySet::from_env)): ", $policies, ". Without them (the default) nothing is checked (insecure mode).")]
        pub fn policies(mut self, policies: std::sync::Arc<$crate::security::PolicySet>) -> Self {
            self.sec.policies = Some(policies);
            self
        }

        #[doc = concat!("Secures the component with `security` ([`Security`](crate::chains::Security)): ", $security, ".")]
        pub fn security(mut self, security: &$crate::chains::Security) -> Self {
            self.sec.set(security);
            self
        }

        /// Owns every task of the component's connections under this token (cancelled:
        /// they all end).
        pub fn root(mut self, root: tokio_util::sync::CancellationToken) -> Self {
            self.root = root;
            self
        }
    };
}

/// Generates setters that insert an application handler at one of the chain's named
/// places: `name => field` appends to the options' `field: Vec<Arc<dyn Handler>>`, with
/// the doc comment written before it.
macro_rules! handler_setters {
    ($($(#[$doc:meta])* $name:ident => $field:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, handler: impl $crate::core::Handler) -> Self {
                self.$field.push(std::sync::Arc::new(handler));
                self
            }
        )*
    };
}
