from tappass_host.cli import main

main()
