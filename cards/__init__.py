"""AI cards: a streamed card per task, its buttons, the card API calls and their wiring."""
