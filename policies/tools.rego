# Tools a team may offer to a model at all; a request offering any other is refused.
#
# Tools are named as input.request.tools names them (docs/policies.md): a function or custom
# tool by its name, a built-in tool by its type (web_search, local_shell, computer_use_preview),
# an MCP server as mcp:<server>.
#
# Data (tools.json):
#   teams.<team>.tools   the only tools the team may offer; an entry ending in * allows every
#                        tool it starts ("mcp:*": any MCP server). A team without the list may
#                        offer any tool not blocked below.
#   blocked_tools.<tool> a reason: no team may offer the tool.
package lockgate.tools

import rego.v1

import data.lockgate.models

listed(name, allowed) if name in allowed

listed(name, allowed) if {
	some entry in allowed
	endswith(entry, "*")
	startswith(name, trim_suffix(entry, "*"))
}

deny contains msg if {
	allowed := models.team.tools
	some name in input.request.tools
	not listed(name, allowed)
	msg := sprintf("team %s may not offer tool %v to a model (allowed: %s)", [input.principal.team, name, concat(", ", allowed)])
}

deny contains msg if {
	some name in input.request.tools
	reason := data.lockgate.blocked_tools[name]
	msg := sprintf("tool %v may not be offered to a model: %s", [name, reason])
}
