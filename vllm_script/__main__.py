from vllm_script.cli import main

main()
