# Models per team, and the aliases callers may use for catalog models.
#
# Data:
#   teams.<team>.models   (teams.json)  the catalog models the team may call; an alias of one of
#                                       them is allowed too. A team the data does not name may
#                                       call nothing.
#   aliases.<alias>       (models.json) the catalog model an alias stands for: "fast" -> "mock-fast".
#                                       GET /v1/models lists a team's aliases beside its models.
package lockgate.models

import rego.v1

# The catalog model the caller means: an alias resolves to its catalog name; any other name is
# taken as it is (and gets 404 model_not_found from the gateway if the catalog lacks it).
model := object.get(aliases, input.request.model, input.request.model)

default aliases := {}

aliases := data.lockgate.aliases

# The caller's team, as the data describes it; undefined for a team the data does not name.
team := data.lockgate.teams[input.principal.team]

# The team may use the model.
permitted if model in team.models

deny contains msg if {
	not team
	msg := sprintf("team %s is not configured in the policy data", [input.principal.team])
}

deny contains msg if {
	team
	not permitted
	msg := sprintf("team %s may not use model %s (allowed: %s)", [input.principal.team, model, concat(", ", object.get(team, "models", []))])
}
