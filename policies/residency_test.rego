# Unit tests of residency.rego: the regions a team's and an org's data may go to.
package lockgate_test.residency

import rego.v1

import data.lockgate
import data.lockgate_test.call

regions := {"eu-model": "eu", "us-model": "us"}

teams := {
	"eu-only": {"models": ["eu-model", "us-model", "nowhere"], "regions": ["eu"]},
	"anywhere": {"models": ["eu-model", "us-model", "nowhere"]},
}

test_the_shipped_teams_models_are_inside_their_regions if {
	lockgate.decision.allow with input as call({"team": "finance"}, {"model": "mock-smart"})
	lockgate.decision.allow with input as call({"team": "research"}, {"model": "mock-smart"})
}

test_a_team_with_regions_is_refused_a_model_outside_them if {
	d := lockgate.decision with input as call({"team": "eu-only", "org": "solo"}, {"model": "us-model"})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
	not d.allow
	d.reasons == ["team eu-only may not send data to us-model: it runs in us, and the team's data may go only to eu"]
}

test_a_team_with_regions_may_use_a_model_inside_them if {
	lockgate.decision.allow with input as call({"team": "eu-only", "org": "solo"}, {"model": "eu-model"})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
}

test_a_model_without_a_region_is_outside_every_list if {
	d := lockgate.decision with input as call({"team": "eu-only", "org": "solo"}, {"model": "nowhere"})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
	d.reasons == ["team eu-only may not send data to nowhere: it runs in no known region, and the team's data may go only to eu"]
}

test_without_regions_a_team_may_go_anywhere if {
	lockgate.decision.allow with input as call({"team": "anywhere", "org": "solo"}, {"model": "nowhere"})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
}

test_the_orgs_regions_bind_all_its_teams if {
	d := lockgate.decision with input as call({"team": "anywhere", "org": "acme"}, {"model": "us-model"})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
		with data.lockgate.orgs as {"acme": {"regions": ["eu"]}}
	d.reasons == ["team anywhere may not send data to us-model: it runs in us, and the team's data may go only to eu"]
}

test_team_and_org_regions_both_apply if {
	# The org allows us, the team does not.
	not lockgate.residency.allows("us-model") with input as call({"team": "eu-only", "org": "acme"}, {})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
		with data.lockgate.orgs as {"acme": {"regions": ["eu", "us"]}}
	lockgate.residency.allows("eu-model") with input as call({"team": "eu-only", "org": "acme"}, {})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
		with data.lockgate.orgs as {"acme": {"regions": ["eu", "us"]}}
}

test_a_model_the_team_may_not_use_gets_one_reason_only if {
	d := lockgate.decision with input as call({"team": "eu-only", "org": "solo"}, {"model": "other"})
		with data.lockgate.teams as teams with data.lockgate.model_regions as regions
	d.reasons == ["team eu-only may not use model other (allowed: eu-model, us-model, nowhere)"]
}
