# Unit tests of routing.rego: the route and its fallbacks.
package lockgate_test.routing

import rego.v1

import data.lockgate
import data.lockgate_test.call

test_the_route_is_the_model_an_alias_means if {
	lockgate.decision.route.model == "mock-smart" with input as call({}, {"model": "smart"})
}

test_fallbacks_follow_the_data if {
	d := lockgate.decision with input as call({}, {"model": "smart"})
	d.route == {"model": "mock-smart", "fallbacks": ["mock-fast"]}
}

test_a_model_without_fallbacks_has_none if {
	lockgate.routing.fallbacks == [] with input as call({}, {"model": "mock-fast"})
}

test_fallbacks_the_team_may_not_use_are_dropped if {
	fallbacks := lockgate.routing.fallbacks with input as call({"team": "lab"}, {"model": "big"})
		with data.lockgate.teams as {"lab": {"models": ["big", "medium"]}}
		with data.lockgate.fallbacks as {"big": ["huge", "medium", "small"]}
		with data.lockgate.model_regions as {"big": "eu", "medium": "eu", "small": "eu", "huge": "eu"}
	fallbacks == ["medium"]
}

test_fallbacks_outside_the_teams_regions_are_dropped if {
	fallbacks := lockgate.routing.fallbacks with input as call({"team": "lab"}, {"model": "big"})
		with data.lockgate.teams as {"lab": {"models": ["big", "medium", "small"], "regions": ["eu"]}}
		with data.lockgate.fallbacks as {"big": ["medium", "small"]}
		with data.lockgate.model_regions as {"big": "eu", "medium": "us", "small": "eu"}
	fallbacks == ["small"]
}
