return KvmSharp.Cli.Img.ImgCommand.Run(args, Console.Out, Console.Error);
