# Unit tests for the default policy: `lockgate policy test` runs every test_ rule.
package lockgate_test

import rego.v1

import data.lockgate

base := {
	"principal": {"key_id": "k_1", "user": "ana", "team": "research", "org": "acme", "roles": [], "labels": {}},
	"request": {"endpoint": "chat.completions", "model": "mock-fast", "stream": false, "max_tokens": 100, "tools": [], "message_count": 1, "metadata": {}},
	"estimate": {"input_tokens": 10, "output_tokens_max": 100, "cost_usd_max": 0.001, "cost_micro_usd_max": 1000},
	"spend": {},
	"now": "2026-11-25T04:00:00Z",
}

test_research_may_use_mock_fast if {
	d := lockgate.decision with input as base
	d.allow
	d.route.model == "mock-fast"
}

test_alias_resolves_to_catalog_model if {
	d := lockgate.decision with input as object.union(base, {"request": object.union(base.request, {"model": "smart"})})
	d.allow
	d.route.model == "mock-smart"
	d.route.fallbacks == ["mock-fast"]
}

test_support_may_not_use_mock_smart if {
	d := lockgate.decision with input as object.union(base, {"principal": object.union(base.principal, {"team": "support"}), "request": object.union(base.request, {"model": "mock-smart"})})
	not d.allow
	d.reasons == ["team support may not use model mock-smart (allowed: mock-fast)"]
}

test_unknown_team_is_denied if {
	d := lockgate.decision with input as object.union(base, {"principal": object.union(base.principal, {"team": "nobody"})})
	not d.allow
}

test_team_budget_is_charged if {
	d := lockgate.decision with input as base
	d.budgets == [{"scope": "team:research", "window": "month", "limit_usd": 100}]
}

test_transfer_funds_needs_finance_approval if {
	d := lockgate.decision with input as object.union(base, {"request": object.union(base.request, {"tools": ["search_web", "transfer_funds"]})})
	d.allow
	d.approval.required
	d.approval.approvers == ["finance"]
}

test_plain_tools_need_no_approval if {
	d := lockgate.decision with input as object.union(base, {"request": object.union(base.request, {"tools": ["search_web"]})})
	d.approval.required == false
}

test_an_approver_team_member_may_approve if {
	lockgate.may_approve with input as {"approval": {"approvers": ["finance"]}, "decider": {"team": "finance"}}
}

test_another_team_may_not_approve if {
	not lockgate.may_approve with input as {"approval": {"approvers": ["finance"]}, "decider": {"team": "research"}}
}

test_no_named_approvers_means_nobody if {
	not lockgate.may_approve with input as {"approval": {"approvers": []}, "decider": {"team": "finance"}}
}
