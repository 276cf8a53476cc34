# Server side: the token of the previous segment (the caller's) is signed by the peer
# certificate of this connection (input.auth_info.certificate) and has not expired.
# Rego here has no ES256 builtin, so the SDK verifies the signature in Rust and puts the
# result in path_segments[index - 1].signed_by_peer.
package nsm

import rego.v1

default prev_token_signed := false

prev_token_signed if {
	input.index > 0
	input.path_segments[input.index - 1].signed_by_peer == true
}
