# Routing: the catalog model a call goes to, and the models tried in turn when it keeps failing.
#
# Data (models.json):
#   aliases            resolved in models.rego: the route is the catalog model meant.
#   fallbacks.<model>  catalog models to try, in order, when <model> keeps failing (after the
#                      gateway's retries). A fallback is kept only if the team may use it and it
#                      runs in a region the team's data may go to (residency.rego); the others
#                      are dropped, so one fallbacks list serves every team.
package lockgate.routing

import rego.v1

import data.lockgate.models
import data.lockgate.residency

fallbacks := [m |
	some m in object.get(data.lockgate.fallbacks, models.model, [])
	m in models.team.models
	residency.allows(m)
]
