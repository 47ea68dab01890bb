# The default Lockgate policy. The gateway evaluates data.lockgate.decision once per call with
# the input document described in docs/policies.md; data.json beside this file holds the teams,
# their models and budgets, model aliases, fallbacks, and the tools that need approval.
package lockgate

import rego.v1

# Rule names must not collide with the data of data.json, which lives under data.lockgate too.

# The catalog model the caller means: an alias such as "fast" resolves to a catalog name.
model := object.get(data.lockgate.aliases, input.request.model, input.request.model)

team := data.lockgate.teams[input.principal.team]

deny contains msg if {
	not data.lockgate.teams[input.principal.team]
	msg := sprintf("team %s is not configured in the policy data", [input.principal.team])
}

deny contains msg if {
	not model in team.models
	msg := sprintf("team %s may not use model %s (allowed: %s)", [input.principal.team, model, concat(", ", team.models)])
}

# Fallbacks the team may also use, in the order data lists them.
route_fallbacks := [m | some m in object.get(data.lockgate.fallbacks, model, []); m in team.models]

team_budgets := [{"scope": sprintf("team:%s", [input.principal.team]), "window": "month", "limit_usd": team.monthly_budget_usd}] if {
	team.monthly_budget_usd
} else := []

# Tools offered to the model that a human must approve first.
held_tools := [t | some t in input.request.tools; data.lockgate.approval_tools[t]]

approval_request := {
	"required": true,
	"reason": sprintf("tool %s needs approval", [held_tools[0]]),
	"approvers": data.lockgate.approval_tools[held_tools[0]].approvers,
	"timeout_s": object.get(data.lockgate.approval_tools[held_tools[0]], "timeout_s", 900),
} if {
	count(held_tools) > 0
} else := {"required": false}

# Prompt and reply content in the audit record: off, unless a team's data says hash, redacted or full.
audit_content := object.get(data.lockgate.teams[input.principal.team], "audit_content", "off")

default decision := {"allow": false, "reasons": ["no rule of the policy allowed this call"]}

decision := {"allow": false, "reasons": sort(deny)} if count(deny) > 0

decision := {
	"allow": true,
	"reasons": [sprintf("team %s may use %s", [input.principal.team, model])],
	"route": {"model": model, "fallbacks": route_fallbacks},
	"budgets": team_budgets,
	"approval": approval_request,
	"audit": {"labels": {"team": input.principal.team}, "content": audit_content},
} if {
	count(deny) == 0
	team
}

# Who may decide an approval (the gateway asks with input.approval and input.decider): a member of
# one of the teams the decision named as its approvers. The gateway itself refuses, whatever this
# says, a decider without the approver or admin role, of another org, or deciding her own call.
default may_approve := false

may_approve if input.decider.team in input.approval.approvers
