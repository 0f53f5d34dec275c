"""The top layer: the `segrec` command line and the demo, the only code that imports every package.

    main                 parser, dispatch, logging, error -> exit code (the console script)
    registry             the @command registry and UserError
    *_command(s)         one module per command group: flags -> a frozen config -> the library call
    demo                 `segrec demo`: the main job end to end, in numbered stages
"""
