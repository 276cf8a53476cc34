# Every segment of the path carries a token that decodes (a JWT with sub, aud, exp).
# Input: path_segments[i].claims, decoded by the SDK; null when the token does not decode.
package nsm

import rego.v1

default tokens_valid := false

tokens_valid if {
	count(input.path_segments) > 0
	valid := [s | some s in input.path_segments; is_object(s.claims)]
	count(valid) == count(input.path_segments)
}
