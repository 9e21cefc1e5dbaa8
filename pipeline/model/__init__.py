"""The vision-language model: loading it, and the engines that turn token ids and image features into tokens."""
