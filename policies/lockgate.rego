# The default Lockgate policy: the entrypoints the gateway evaluates.
#
# The gateway evaluates data.lockgate.decision once per call (input: docs/policies.md), asks
# data.lockgate.response_decision about replies that call tools (review.rego), and
# data.lockgate.may_approve about whoever decides a held call. This module only assembles the
# answer; each concern has its own module and its own data file:
#
#   models.rego     models.json, teams.json   which models a team may use; aliases
#   routing.rego    models.json               the model called and its fallbacks
#   budgets.rego    budgets.json              money budgets (micro-dollars), rate limits, run caps
#   approvals.rego  approvals.json            calls a human must approve; who may approve
#   tools.rego      tools.json                tools a team may offer to a model
#   residency.rego  residency.json            regions a team's and an org's data may go to
#
# Every *.json under this folder is merged into data (a key defined twice stops start-up), so
# the files of one team's settings add up: data.lockgate.teams.research gets its models from
# teams.json and its budget from budgets.json. Rules live in packages data.lockgate.<concern>,
# so no data key under data.lockgate may be named models, routing, budgets, approvals, tools
# or residency, nor like a rule of this module (decision, deny, may_approve, response_decision).
package lockgate

import rego.v1

import data.lockgate.approvals
import data.lockgate.budgets
import data.lockgate.models
import data.lockgate.residency
import data.lockgate.routing
import data.lockgate.tools

# Every reason to refuse the call, whichever concern gives it.
deny := (models.deny | tools.deny) | residency.deny

default decision := {"allow": false, "reasons": ["no rule of the policy allowed this call"]}

decision := {"allow": false, "reasons": sort(deny)} if count(deny) > 0

decision := {
	"allow": true,
	"reasons": [sprintf("team %s may use %s", [input.principal.team, models.model])],
	"route": {"model": models.model, "fallbacks": routing.fallbacks},
	"budgets": budgets.reserve,
	"limits": budgets.limits,
	"approval": approvals.approval,
	# What the audit record keeps of prompt and reply: off, unless the team's data says hash,
	# redacted or full (docs/audit.md).
	"audit": {"labels": {"team": input.principal.team}, "content": object.get(models.team, "audit_content", "off")},
} if {
	count(deny) == 0
	models.permitted
}

# Who may decide a held call (approvals.rego). The gateway itself refuses, whatever this says,
# a decider without the approver or admin role, of another org, or deciding her own call.
default may_approve := false

may_approve if approvals.may_approve
