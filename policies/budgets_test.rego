# Unit tests of budgets.rego: money budgets in micro-dollars, rate limits and run caps.
package lockgate_test.budgets

import rego.v1

import data.lockgate
import data.lockgate_test.base
import data.lockgate_test.call

test_the_team_budget_is_charged_in_micro_dollars if {
	d := lockgate.decision with input as base
	d.budgets == [{"scope": "team:research", "window": "month", "limit_micro_usd": 100000000}]
}

test_team_day_and_member_budgets if {
	d := lockgate.decision with input as call({"team": "support", "user": "bo"}, {})
	d.budgets == [
		{"scope": "team:support", "window": "month", "limit_micro_usd": 20000000},
		{"scope": "team:support", "window": "day", "limit_micro_usd": 2000000},
		{"scope": "user:bo", "window": "month", "limit_micro_usd": 5000000},
	]
}

test_a_team_without_budgets_reserves_against_none if {
	lockgate.budgets.reserve == [] with input as call({"team": "lab"}, {}) with data.lockgate.teams as {"lab": {"models": ["mock-fast"]}}
}

test_a_zero_budget_is_a_budget if {
	reserve := lockgate.budgets.reserve with input as call({"team": "lab"}, {})
		with data.lockgate.teams as {"lab": {"monthly_budget_micro_usd": 0}}
	reserve == [{"scope": "team:lab", "window": "month", "limit_micro_usd": 0}]
}

test_the_defaults_limit_every_team if {
	d := lockgate.decision with input as base
	d.limits == {"max_steps_per_run": 200, "max_cost_micro_usd_per_run": 20000000}
}

test_a_teams_limits_override_the_defaults if {
	d := lockgate.decision with input as call({"team": "support"}, {})
	d.limits == {
		"max_tokens": 2048,
		"requests_per_minute": {"user": 120},
		"tokens_per_minute": {"team": 400000},
		"concurrent": {"user": 8},
		"max_steps_per_run": 40,
		"max_cost_micro_usd_per_run": 20000000,
	}
}

test_rate_limits_merge_per_level if {
	limits := lockgate.budgets.limits with input as call({"team": "lab"}, {})
		with data.lockgate.teams as {"lab": {"limits": {"requests_per_minute": {"team": 600}}}}
		with data.lockgate.default_limits as {"requests_per_minute": {"user": 60}}
	limits == {"requests_per_minute": {"user": 60, "team": 600}}
}

test_limits_pass_through_as_the_data_gives_them if {
	limits := lockgate.budgets.limits with input as call({"team": "lab"}, {})
		with data.lockgate.teams as {"lab": {"limits": {"max_tokens": 10, "concurrent": {"key": 2}}}}
		with data.lockgate.default_limits as {"max_tokens": 4000}
	limits == {"max_tokens": 10, "concurrent": {"key": 2}}
}
