# Unit tests of approvals.rego: held tools, expensive calls, held replies, who may decide.
package lockgate_test.approvals

import rego.v1

import data.lockgate
import data.lockgate_test.base
import data.lockgate_test.call

# A call whose output may reach ``tokens`` (the gateway's estimate: max_tokens, or its default, times n).
out(principal, request, tokens) := object.union(call(principal, request), {"estimate": {"output_tokens_max": tokens}})

test_transfer_funds_needs_finance_approval if {
	d := lockgate.decision with input as call({}, {"tools": ["search_web", "transfer_funds"]})
	d.allow
	d.approval == {"required": true, "reason": "tool transfer_funds needs approval", "approvers": ["finance"], "timeout_s": 900}
}

test_plain_tools_need_no_approval if {
	d := lockgate.decision with input as call({}, {"tools": ["search_web"]})
	d.approval == {"required": false}
}

test_a_tool_held_when_called_does_not_hold_the_request if {
	d := lockgate.decision with input as call({"team": "support"}, {"tools": ["issue_refund"]})
	d.allow
	d.approval == {"required": false}
}

test_the_first_held_tool_names_the_approvers if {
	approval := lockgate.approvals.approval with input as call({}, {"tools": ["a", "b"]})
		with data.lockgate.approval_tools as {"b": {"approvers": ["legal"], "timeout_s": 60}, "a": {"approvers": ["security"]}}
	approval == {"required": true, "reason": "tool a needs approval", "approvers": ["security"], "timeout_s": 900}
}

test_a_call_whose_output_may_cost_more_than_the_threshold_is_held if {
	# mock-smart's output: $10 per million tokens, 10 micro-dollars a token; 600000 tokens: $6.
	d := lockgate.decision with input as out({}, {"model": "mock-smart"}, 600000)
	d.allow
	d.approval.required
	d.approval.approvers == ["finance"]
	d.approval.reason == "a call to mock-smart may cost up to 6000000 micro-dollars of output, above the 5000000 the team may spend on one call without approval"
}

test_a_call_at_the_threshold_is_not_held if {
	d := lockgate.decision with input as out({}, {"model": "mock-smart"}, 500000)
	d.approval == {"required": false}
}

test_every_choice_counts if {
	# 8 choices of 70000 tokens: the estimate says 560000, $5.60 of output.
	d := lockgate.decision with input as out({}, {"model": "mock-smart", "max_tokens": 70000, "choices": 8}, 560000)
	d.approval.required
}

test_the_teams_token_cap_bounds_each_choice if {
	# support's max_tokens (2048) caps what each choice may produce, whatever it asks for.
	lockgate.approvals.output_tokens == 4096 with input as out({"team": "support"}, {"choices": 2}, 1800000)
}

test_without_a_team_cap_the_estimate_counts if {
	lockgate.approvals.output_tokens == 12288 with input as out({}, {"max_tokens": null, "choices": 3}, 12288)
}

test_a_team_threshold_overrides_the_default if {
	approval := lockgate.approvals.approval with input as out({}, {"model": "mock-smart"}, 1000)
		with data.lockgate.teams.research.approval_above_micro_usd as 5000
	approval.required
}

test_a_held_tool_comes_before_an_expensive_call if {
	approval := lockgate.approvals.approval with input as out({}, {"model": "mock-smart", "tools": ["transfer_funds"]}, 600000)
	approval.reason == "tool transfer_funds needs approval"
}

test_a_model_the_catalog_lacks_holds_nothing if {
	lockgate.approvals.approval == {"required": false} with input as out({}, {"model": "ghost"}, 900000)
}

replying(calls) := object.union(base, {"response": {"tool_calls": calls}})

test_only_tools_held_when_called_hold_a_reply if {
	not lockgate.approvals.reply_approval with input as replying(["transfer_funds"])
	lockgate.approvals.reply_approval.approvers == ["finance"] with input as replying(["issue_refund"])
}

test_a_decider_of_an_approver_team_may_approve if {
	lockgate.approvals.may_approve with input as {"approval": {"approvers": ["finance", "legal"]}, "decider": {"team": "legal"}}
}
