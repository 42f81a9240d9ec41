"""agent_forge: tools for building language-model agents. EvoMerge lives in
`agent_forge.evomerge`."""
