# Calls a human must approve before they run, replies held until one does, and who may decide.
#
# Data (approvals.json):
#   approval_tools.<tool>  {"approvers": [teams], "timeout_s": 900, "when": "offered" | "called"}
#       "offered" (the default): a request that offers the tool to the model is held before any
#       provider sees it. "called": only a reply in which the model calls the tool is held,
#       before the client sees it (review.rego).
#   expensive_calls  {"above_micro_usd": N, "approvers": [teams], "timeout_s": 900}
#       a call whose worst-case output may cost more than N micro-dollars is held. A team's
#       teams.<team>.approval_above_micro_usd overrides N for that team.
# approvers name teams: a member of one of them, with the approver or admin role, may decide.
package lockgate.approvals

import rego.v1

import data.lockgate.budgets
import data.lockgate.models

# The request's tools that need approval once offered, in the request's order.
held_tools := [t |
	some t in input.request.tools
	object.get(data.lockgate.approval_tools[t], "when", "offered") == "offered"
]

# The call's output tokens at most, as the gateway reserves for them: the estimate counts its
# max_tokens (else the gateway's default) for each of its choices (n), and the team's max_tokens
# caps each choice. Counting the output only, never the prompt's tokens (which change with every
# prompt), the decision is reused for every call of a user with the same model, tools,
# max_tokens and n.
output_tokens := min([input.estimate.output_tokens_max, budgets.limits.max_tokens * input.request.choices]) if {
	is_number(budgets.limits.max_tokens)
} else := input.estimate.output_tokens_max

# A call whose output may cost more than the team's threshold, in micro-dollars. The catalog's
# output_micro_usd_per_mtok is micro-dollars per million tokens: integers, compared exactly.
expensive_approval := {
	"required": true,
	"reason": sprintf(
		"a call to %s may cost up to %d micro-dollars of output, above the %d the team may spend on one call without approval",
		[models.model, cost, above],
	),
	"approvers": data.lockgate.expensive_calls.approvers,
	"timeout_s": object.get(data.lockgate.expensive_calls, "timeout_s", 900),
} if {
	above := object.get(models.team, "approval_above_micro_usd", data.lockgate.expensive_calls.above_micro_usd)
	cost_per_mtok := output_tokens * data.lockgate.catalog[models.model].output_micro_usd_per_mtok
	cost_per_mtok > above * 1000000
	cost := ceil(cost_per_mtok / 1000000) # for the message only
}

# The decision's approval: the first held tool's, else an expensive call's, else none.
approval := {
	"required": true,
	"reason": sprintf("tool %s needs approval", [held_tools[0]]),
	"approvers": data.lockgate.approval_tools[held_tools[0]].approvers,
	"timeout_s": object.get(data.lockgate.approval_tools[held_tools[0]], "timeout_s", 900),
} if {
	count(held_tools) > 0
} else := expensive_approval if {
	expensive_approval
} else := {"required": false}

# The reply's tool calls that need approval ("when": "called"), in the reply's order.
called_tools := [t |
	some t in input.response.tool_calls
	object.get(data.lockgate.approval_tools[t], "when", "offered") == "called"
]

reply_approval := {
	"required": true,
	"reason": sprintf("the model called %s, which needs approval", [called_tools[0]]),
	"approvers": data.lockgate.approval_tools[called_tools[0]].approvers,
	"timeout_s": object.get(data.lockgate.approval_tools[called_tools[0]], "timeout_s", 900),
} if {
	count(called_tools) > 0
}

# A member of one of the teams the decision named as its approvers may decide.
may_approve if input.decider.team in input.approval.approvers
