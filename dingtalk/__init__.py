"""The DingTalk side: the Stream connection, the intake thread, the JSON HTTP client, message parts, the call budget."""
