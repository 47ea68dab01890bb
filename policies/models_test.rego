# Unit tests of models.rego: models per team, and aliases.
package lockgate_test.models

import rego.v1

import data.lockgate
import data.lockgate_test.base
import data.lockgate_test.call

test_an_alias_resolves_to_its_catalog_model if {
	d := lockgate.decision with input as call({}, {"model": "smart"})
	d.allow
	d.route.model == "mock-smart"
	d.reasons == ["team research may use mock-smart"]
}

test_a_name_that_is_no_alias_is_taken_as_it_is if {
	lockgate.models.model == "mock-fast" with input as base
}

test_support_may_not_use_mock_smart if {
	d := lockgate.decision with input as call({"team": "support"}, {"model": "mock-smart"})
	not d.allow
	d.reasons == ["team support may not use model mock-smart (allowed: mock-fast)"]
}

test_an_alias_of_a_model_the_team_may_not_use_is_refused_by_its_model if {
	d := lockgate.decision with input as call({"team": "support"}, {"model": "smart"})
	d.reasons == ["team support may not use model mock-smart (allowed: mock-fast)"]
}

test_an_unknown_team_is_denied if {
	d := lockgate.decision with input as call({"team": "nobody"}, {})
	not d.allow
	d.reasons == ["team nobody is not configured in the policy data"]
}

test_a_team_may_use_exactly_its_models if {
	teams := {"lab": {"models": ["m1"]}}
	lockgate.models.permitted with input as call({"team": "lab"}, {"model": "m1"}) with data.lockgate.teams as teams
	not lockgate.models.permitted with input as call({"team": "lab"}, {"model": "m2"}) with data.lockgate.teams as teams
}
