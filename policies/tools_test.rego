# Unit tests of tools.rego: the tools a team may offer to a model.
package lockgate_test.tools

import rego.v1

import data.lockgate
import data.lockgate_test.call

lab := {"lab": {"models": ["mock-fast"], "tools": ["search_kb", "mcp:*"]}}

test_a_team_without_a_list_may_offer_any_tool if {
	d := lockgate.decision with input as call({}, {"tools": ["search_web", "local_shell", "mcp:github"]})
	d.allow
}

test_a_team_with_a_list_may_offer_those_tools if {
	d := lockgate.decision with input as call({"team": "support"}, {"tools": ["search_kb", "lookup_order", "mcp:helpdesk"]})
	d.allow
}

test_a_team_with_a_list_may_not_offer_others if {
	d := lockgate.decision with input as call({"team": "support"}, {"tools": ["search_kb", "mcp:github"]})
	not d.allow
	d.reasons == ["team support may not offer tool mcp:github to a model (allowed: search_kb, lookup_order, issue_refund, mcp:helpdesk)"]
}

test_an_entry_ending_in_a_star_allows_what_it_starts if {
	count(lockgate.tools.deny) == 0 with input as call({"team": "lab"}, {"tools": ["mcp:github", "mcp:jira"]}) with data.lockgate.teams as lab
	count(lockgate.tools.deny) == 1 with input as call({"team": "lab"}, {"tools": ["search_web"]}) with data.lockgate.teams as lab
}

test_a_blocked_tool_is_refused_to_every_team if {
	deny := lockgate.tools.deny with input as call({}, {"tools": ["computer_use_preview"]})
		with data.lockgate.blocked_tools as {"computer_use_preview": "it controls a computer"}
	deny == {"tool computer_use_preview may not be offered to a model: it controls a computer"}
}

test_no_tools_no_denial if {
	count(lockgate.tools.deny) == 0 with input as call({"team": "support"}, {"tools": []})
}
