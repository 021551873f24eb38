from llmexp.cli import main

main()
