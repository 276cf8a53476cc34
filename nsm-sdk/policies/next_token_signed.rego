# Client side, on the returned path: the token of the next segment (the server's) is
# signed by the peer certificate of this connection and has not expired. The SDK
# verifies the signature in Rust: path_segments[index + 1].signed_by_peer.
package nsm

import rego.v1

default next_token_signed := false

next_token_signed if {
	input.path_segments[input.index + 1].signed_by_peer == true
}
