# MonitorConnection: a subscriber sees a connection only when its own identity signed
# a segment of the connection's path (input.subscriber is its SPIFFE ID).
package nsm

import rego.v1

default service_connection := false

service_connection if {
	some s in input.path_segments
	s.claims.sub == input.subscriber
}
