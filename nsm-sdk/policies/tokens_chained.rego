# Each token was made for the hop after it: the aud of segment i holds the sub of
# segment i+1. A token replayed from another path breaks the chain.
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
