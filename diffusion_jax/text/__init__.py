"""Text for conditioning: tokenizers, the `text` config section and prompt handling."""
