"""The netns lab: real hosts, real NATs (nftables), real punch processes."""
