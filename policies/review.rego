# Reply review: the gateway shows every reply that calls tools to data.lockgate.response_decision
# (docs/policies.md, "Reply review"). Here a reply calling a tool of approval_tools with
# "when": "called" (approvals.rego) is held until a decider approves it; any other is released.
#
# While this rule exists, a streamed reply is relayed as it comes only until its first tool-call
# event; the rest is held until the stream ends and the policy has seen it. Delete this file to
# relay tool-call streams unbuffered (and to hold no reply).
package lockgate

import rego.v1

import data.lockgate.approvals

default response_decision := {"allow": true}

response_decision := {"allow": true, "approval": approvals.reply_approval} if approvals.reply_approval
