# Budgets and limits. Money is in integer micro-dollars ($1 = 1000000): regorus computes floats
# in binary (0.1 + 0.2 > 0.3), so neither data nor rules here use float dollars.
#
# Data (budgets.json), per team under teams.<team>:
#   monthly_budget_micro_usd       the team's spend per calendar month (scope team:<team>)
#   daily_budget_micro_usd         the team's spend per day (scope team:<team>)
#   user_monthly_budget_micro_usd  each member's own spend per month (scope user:<user>)
#   limits                         any of the limits below; they override default_limits
# and default_limits, for every team:
#   max_tokens                     caps each call's output tokens (and is given to calls without one)
#   requests_per_minute, tokens_per_minute, concurrent
#                                  {"key": N, "user": N, "team": N}: rate limits on the caller
#   max_steps_per_run              calls one agent run (Lockgate-Run-Id) may make
#   max_cost_micro_usd_per_run     what one agent run may cost
#
# The gateway reserves each call's worst case against every budget atomically and refuses with
# 429 what one cannot cover (docs/budgets.md); rules here only name the limits, they never read
# input.spend, so their answer is reused across calls (docs/policies.md, "Reused decisions").
package lockgate.budgets

import rego.v1

import data.lockgate.models

# The decision's budgets: each money field the team's data sets, charged to its scope and window.
reserve := [{"scope": money.scope, "window": money.window, "limit_micro_usd": limit} |
	some money in [
		{"field": "monthly_budget_micro_usd", "scope": sprintf("team:%s", [input.principal.team]), "window": "month"},
		{"field": "daily_budget_micro_usd", "scope": sprintf("team:%s", [input.principal.team]), "window": "day"},
		{"field": "user_monthly_budget_micro_usd", "scope": sprintf("user:%s", [input.principal.user]), "window": "month"},
	]
	limit := models.team[money.field]
]

default default_limits := {}

default_limits := data.lockgate.default_limits

# The decision's limits: the team's over the defaults (rate limits merge level by level). The
# gateway reads the names above and ignores any other.
limits := object.union(default_limits, object.get(models.team, "limits", {}))
