# No token of the path has expired: every exp is after input.now (unix seconds).
# Named as in Go NSM; it holds when the tokens are NOT expired.
package nsm

import rego.v1

default tokens_expired := false

tokens_expired if {
	count(input.path_segments) > 0
	alive := [s | some s in input.path_segments; s.claims.exp > input.now]
	count(alive) == count(input.path_segments)
}
