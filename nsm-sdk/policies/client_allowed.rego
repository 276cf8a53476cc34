# Registry: a name can be registered by anyone while it is free (resource_owner null),
# and refreshed or unregistered only by the identity that registered it.
package nsm

import rego.v1

default client_allowed := false

client_allowed if {
	input.spiffe_id != ""
	input.resource_owner == null
}

client_allowed if {
	input.spiffe_id != ""
	input.resource_owner == input.spiffe_id
}
