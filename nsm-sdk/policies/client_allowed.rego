# Registry: a name can be registered by anyone while it is free (resource_owner null),
# and refreshed or unregistered only by the identity that registered it. Registering a
# network service exactly as it is registered (input.unchanged: same payload and
# matches) is allowed to anyone and leaves the owner as it was: every endpoint of a
# service registers it, each through its own manager.
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

client_allowed if {
	input.spiffe_id != ""
	input.unchanged == true
}
