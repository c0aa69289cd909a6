from tappass_host.devplane.cli import main

main()
