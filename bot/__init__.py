"""Platform adapters (Telegram, Discord, console) and the `magpie` command line, Magpie's composition root."""
