# Data residency: a team's calls go only to models that run in regions its data may go to.
#
# Data (residency.json, models.json):
#   model_regions.<model>  where a catalog model runs ("eu", "us", any names you choose)
#   teams.<team>.regions   the regions the team's data may go to
#   orgs.<org>.regions     the regions any of the org's data may go to
# A call may go to a model whose region is in every list that applies (the team's and its
# org's); with neither, anywhere. A model without a region is outside every list, so add every
# catalog model to model_regions before you give a team or an org regions. Fallbacks outside
# them are dropped (routing.rego); a requested model outside them is refused.
package lockgate.residency

import rego.v1

import data.lockgate.models

default org_regions := null

org_regions := data.lockgate.orgs[input.principal.org].regions

# Every region list that applies to the caller.
region_lists := [regions | some regions in [object.get(models.team, "regions", null), org_regions]; regions != null]

# Model m runs in a region every list allows.
allows(m) if count(region_lists) == 0

allows(m) if {
	count(region_lists) > 0
	region := data.lockgate.model_regions[m]
	every regions in region_lists {
		region in regions
	}
}

default model_region := "no known region"

model_region := data.lockgate.model_regions[models.model]

deny contains msg if {
	models.permitted
	not allows(models.model)
	allowed := [r | some r in region_lists[0]; every regions in region_lists { r in regions }]
	msg := sprintf("team %s may not send data to %s: it runs in %s, and the team's data may go only to %s", [
		input.principal.team, models.model, model_region,
		concat(", ", allowed),
	])
}
