# Each token was made for the hop after it: the aud of segment i holds the sub of
# segment i+1. A token replayed from another path breaks the chain. Two consecutive
# segments of one identity (the server and client halves of a passthrough endpoint, each
# with a segment of its own) are chained by that identity itself.
package nsm

import rego.v1

default tokens_chained := false

tokens_chained if {
	count(input.path_segments) == 1
}

tokens_chained if {
	n := count(input.path_segments)
	n > 1
	links := [i | some i, _ in input.path_segments; i < n - 1; chained(i)]
	count(links) == n - 1
}

chained(i) if {
	some aud in input.path_segments[i].claims.aud
	aud == input.path_segments[i + 1].claims.sub
}

chained(i) if {
	input.path_segments[i].claims.sub == input.path_segments[i + 1].claims.sub
}
