# Unit tests of the entrypoints and of the shipped data: `lockgate policy test` runs every
# test_ rule of every *_test.rego. The inputs below follow docs/policies.md; each concern's
# rules have their own <concern>_test.rego, which build their inputs with call() from here.
package lockgate_test

import rego.v1

import data.lockgate

base := {
	"principal": {"key_id": "k_1", "user": "ana", "team": "research", "org": "acme", "roles": [], "labels": {}},
	"request": {
		"endpoint": "chat.completions", "model": "mock-fast", "stream": false, "max_tokens": 100, "choices": 1,
		"tools": [], "message_count": 1, "metadata": {},
	},
	"estimate": {"input_tokens": 10, "output_tokens_max": 100, "cost_usd_max": 0.001, "cost_micro_usd_max": 1000},
	"spend": {},
	"run": null,
	"now": "2026-11-25T04:00:00Z",
}

# The base input with some of its principal's and request's fields changed.
call(principal, request) := object.union(base, {
	"principal": object.union(base.principal, principal),
	"request": object.union(base.request, request),
})

# --- decision ---------------------------------------------------------------------------------

test_research_may_use_mock_fast if {
	d := lockgate.decision with input as base
	d.allow
	d.reasons == ["team research may use mock-fast"]
	d.route == {"model": "mock-fast", "fallbacks": []}
	d.approval == {"required": false}
	d.audit == {"labels": {"team": "research"}, "content": "off"}
}

test_a_denial_gives_every_reason_sorted if {
	d := lockgate.decision with input as call({"team": "support"}, {"model": "mock-smart", "tools": ["run_sql"]})
	not d.allow
	d.reasons == [
		"team support may not offer tool run_sql to a model (allowed: search_kb, lookup_order, issue_refund, mcp:helpdesk)",
		"team support may not use model mock-smart (allowed: mock-fast)",
	]
}

test_a_team_without_models_is_not_allowed if {
	d := lockgate.decision with input as base with data.lockgate.teams as {"research": {}}
	not d.allow
	d.reasons == ["team research may not use model mock-fast (allowed: )"]
}

test_an_undefined_answer_denies if {
	d := lockgate.decision with input as {}
	d == {"allow": false, "reasons": ["no rule of the policy allowed this call"]}
}

test_a_team_keeps_the_content_its_data_asks_for if {
	d := lockgate.decision with input as call({"team": "finance"}, {})
	d.audit == {"labels": {"team": "finance"}, "content": "hash"}
}

test_the_decision_carries_budgets_and_limits if {
	d := lockgate.decision with input as call({"team": "support", "user": "bo"}, {})
	d.budgets[0] == {"scope": "team:support", "window": "month", "limit_micro_usd": 20000000}
	d.limits.max_tokens == 2048
}

# --- response_decision (review.rego) ------------------------------------------------------------

test_a_reply_calling_a_tool_held_when_called_is_held if {
	d := lockgate.response_decision with input as object.union(base, {"response": {"tool_calls": ["search_kb", "issue_refund"]}})
	d.allow
	d.approval == {"required": true, "reason": "the model called issue_refund, which needs approval", "approvers": ["finance"], "timeout_s": 1800}
}

test_a_reply_calling_other_tools_is_released if {
	d := lockgate.response_decision with input as object.union(base, {"response": {"tool_calls": ["search_web", "transfer_funds"]}})
	d == {"allow": true}
}

# --- may_approve --------------------------------------------------------------------------------

test_an_approver_team_member_may_approve if {
	lockgate.may_approve with input as {"approval": {"approvers": ["finance"]}, "decider": {"team": "finance"}}
}

test_another_team_may_not_approve if {
	not lockgate.may_approve with input as {"approval": {"approvers": ["finance"]}, "decider": {"team": "research"}}
}

test_no_named_approvers_means_nobody if {
	not lockgate.may_approve with input as {"approval": {"approvers": []}, "decider": {"team": "finance"}}
}

test_may_approve_is_false_not_undefined if {
	lockgate.may_approve == false with input as {}
}

# --- the shipped data ---------------------------------------------------------------------------

money_fields := {"monthly_budget_micro_usd", "daily_budget_micro_usd", "user_monthly_budget_micro_usd", "approval_above_micro_usd"}

whole(n) if {
	is_number(n)
	n >= 0
	floor(n) == n
}

# The gateway refuses a budget or a limit that is not a whole number (503 policy_error on every
# call of the team): these catch a typo in the data before it ships.
test_money_in_the_data_is_whole_micro_dollars if {
	bad := [sprintf("%s.%s", [name, field]) |
		some name, team in data.lockgate.teams
		some field, value in team
		field in money_fields
		not whole(value)
	]
	bad == []
}

test_limits_in_the_data_are_whole_numbers if {
	limits := array.concat([data.lockgate.default_limits], [team.limits | some team in data.lockgate.teams; team.limits])
	bad := [sprintf("%s=%v", [name, value]) |
		some set in limits
		some name, value in set
		not whole(value)
		not every_level_whole(value)
	]
	bad == []
}

every_level_whole(levels) if {
	is_object(levels)
	every level, n in levels {
		level in {"key", "user", "team"}
		whole(n)
	}
}

test_every_team_model_runs_in_a_known_region if {
	missing := {m | some team in data.lockgate.teams; some m in object.get(team, "models", []); not data.lockgate.model_regions[m]}
	missing == set()
}

test_aliases_and_fallbacks_name_models_some_team_uses if {
	used := {m | some team in data.lockgate.teams; some m in object.get(team, "models", [])}
	named := {m | some m in data.lockgate.aliases} | {m | some list in data.lockgate.fallbacks; some m in list}
	named - used == set()
}

test_approvers_are_teams if {
	approvers := {a | some rule in data.lockgate.approval_tools; some a in rule.approvers} | {a | some a in data.lockgate.expensive_calls.approvers}
	every a in approvers {
		data.lockgate.teams[a]
	}
}
